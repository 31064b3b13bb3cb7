"""The nearline lane: every few minutes, landed events to bronze/silver, deltas to every replica,
the feedback join; rollouts of registered versions to replicas; snapshot builds."""
