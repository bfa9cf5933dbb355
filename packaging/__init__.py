"""Deployment files: systemd units and the offline installer scripts that `parrot-edge bundle` ships."""
