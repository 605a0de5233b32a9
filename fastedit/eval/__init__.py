"""fastedit.eval"""
