"""Every way a study arrives (HTTP, STOW-RS, C-STORE, a watched folder, a PACS pull), one path in."""
