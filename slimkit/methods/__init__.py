"""The compression methods: Knowledge Evolution (ke/), merging (merge/), Dynamically Expandable Networks (den/)."""
