"""Text and image data: the embedded default task, GLUE, quiz split, collation."""
