"""Training from the store: the reader, the method's losses, the students, the distillation job and its
evaluation, and the Ray Train scaffold (``worker``, ``driver``, ``rundir``, ``parallel``) that the
FeatSharp training job shares."""
