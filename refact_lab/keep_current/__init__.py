"""Keep the model current: update-and-retrain (`update`), the deploy history with rollback (`deploys`) and the
scheduled update job (`schedule`)."""
