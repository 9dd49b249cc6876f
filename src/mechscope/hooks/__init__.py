"""Hook points, interventions as data, the hook context, and the activation cache."""
