"""The classic claims about batch size and learning rate, each a study plus a verdict rule."""
