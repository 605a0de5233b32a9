"""fastedit.stats"""
