"""The data the vectors learn from and are judged on: preference pairs and the shipped behaviours
(pairs), on-policy pairs for the added behaviours (behaviours), BLEnD cultural items (blend) and the
text corpus the SAE and explanations read (text_source)."""
