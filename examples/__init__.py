"""Users' own tasks for `qstar run task=custom task.target=examples.<module>:<Class>`."""
