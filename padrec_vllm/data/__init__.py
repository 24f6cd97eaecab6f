"""Sequential-recommendation data: S3-Rec loader, leave-one-out split, list-wise examples."""
