"""The method: encoders and heads, critics, MI bounds, momentum keys and the objectives."""
