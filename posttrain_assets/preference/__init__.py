"""Preference: pairs with token counts and tie flags, and the length-confound and tie audit."""
