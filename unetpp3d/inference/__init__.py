"""From a trained model to masks: window networks, the predictor, post-processing and nodule reports."""
