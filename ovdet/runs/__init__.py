"""Run folders: manifest and validation, the lock, the journal, write-error records."""
