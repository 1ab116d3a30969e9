"""Package format, keys, signing, encryption and MNN model inspection."""
