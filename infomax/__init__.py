"""infomax: self-supervised pretraining of image encoders by maximising mutual information between views."""
