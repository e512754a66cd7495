"""The agent as a system service: the install layout and systemd unit, sd_notify, and SIGHUP reloads."""
