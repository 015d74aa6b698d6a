"""The built HTML docs in a real browser (headless Chromium driven by Selenium)."""
