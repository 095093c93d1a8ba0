"""The guard's screen: a local web page served by the daemon, shown in a kiosk browser."""
