"""Synthetic CT phantoms (abdomen with liver, chest with nodules) for the demo and the tests."""
