"""Jobs, sensors and schedules that keep gold current."""
