"""Teacher and student builders."""
