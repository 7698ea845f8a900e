"""Train short, test long: data, evaluation, comparison, training and publishing (not shipped with saved models)."""
