"""What one optimizer step does: the `Trainer` (a task's hooks), the stages and the loop."""
