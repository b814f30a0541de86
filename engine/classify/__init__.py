"""Real/bogus classification: nightsift CNN, braai (ZTF d6_m7) and inference runtimes."""
