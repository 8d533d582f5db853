"""Work: claim a job, analyse its study with the pipelines, store the result objects and their deliveries."""
