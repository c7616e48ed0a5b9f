# A regular package, so that `PYTHONPATH=.` makes `tune run recipes/<name>.py` import these recipes
# rather than the top-level `recipes` package that the torchtune 0.6.1 wheel installs (it raises on
# import). A namespace folder would lose to that package whatever the path order.
