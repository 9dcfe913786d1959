"""Video jobs: file and stream processing, the live webcam loop."""
