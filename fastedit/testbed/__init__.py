"""fastedit.testbed"""
