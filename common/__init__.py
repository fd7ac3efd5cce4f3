"""What the site client and the coordinator share: config, model factory, tasks, record conversion."""
