"""Every core of the host: a supervisor and worker processes meshed behind one port."""
