"""The compression methods: Knowledge Evolution (ke/), merging (merge/), Dynamically Expandable Networks (den/),
and the other routes to the fit hypothesis's network (routes/: scratch, prune, distill)."""
