"""Training programs: lit heads, XBT stages."""
