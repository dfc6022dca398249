"""What runs on the user's modules: the installed forwards (`forwards`), installing and removing
them (`install`), and what keeps concurrent calls apart (`calls`)."""
