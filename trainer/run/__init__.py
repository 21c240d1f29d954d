"""When things happen between calls of the compiled loop: the controller and its parts."""
