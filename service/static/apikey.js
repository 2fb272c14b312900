// The API key the pages send as `Authorization: Bearer`, kept for this tab only
// (sessionStorage), so that the docs and the demo page share it.
"use strict";
const apiKey = {
  name: "dlserve-api-key",
  get() { return sessionStorage.getItem(this.name) || ""; },
  set(key) { sessionStorage.setItem(this.name, key); },
  headers() {
    const key = this.get();
    return key ? { Authorization: "Bearer " + key } : {};
  },
};
