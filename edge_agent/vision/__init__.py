"""Vision: camera capture, people detection and tracking, floor mapping and traffic analytics."""
