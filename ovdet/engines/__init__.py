"""Engines that run a job's detection over many items: local threads and Ray."""
