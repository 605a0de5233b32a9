"""fastedit.editing"""
