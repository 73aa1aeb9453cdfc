"""The controller: drives `Action:` nodes through reboot/replacement and back into service."""
