"""This project's NTK plugins (the algorithms ``auto`` chooses from), built on ``core``."""
