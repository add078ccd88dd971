"""Learning new tasks: the training worker process, its supervision by the server, and the closed-form head
updates that serve a task's classes provisionally before it is trained."""
