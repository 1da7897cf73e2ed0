"""The producer side: poll Patchwork, publish each event once, move the cursor after confirms."""
