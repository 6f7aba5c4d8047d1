"""The relational data influence model: encoder, model, training on oracle trajectories, bootstrap beams."""
