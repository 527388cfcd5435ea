"""What the workers read: prompt datasets and shards (tar and WebDataset), the ControlNet image
lake, and text encoding of prompts into conditioning ahead of training."""
