"""Reading the workspace the one way: through directory descriptors, regular files only, ignore rules applied."""
