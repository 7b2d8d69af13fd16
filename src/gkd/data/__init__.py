"""Training data: rows (read, validate, tokenise), render (chat template, images), batch (collate), order
(the rows of each optimizer step)."""
