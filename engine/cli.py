def main(argv=None):  # placeholder replaced below in this commit series
    raise SystemExit("nightsift: CLI not built yet")
