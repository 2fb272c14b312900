// The docs page: Swagger UI on this server's /docs.json. When the server has an API key,
// the document needs it too: ask for it, then hand it to Swagger UI for "Try it out".
"use strict";

async function showDocs() {
  const form = document.getElementById("key-form");
  const response = await fetch("docs.json", { headers: apiKey.headers() });
  if (response.status === 401) {
    document.getElementById("key-why").textContent = apiKey.get()
      ? "That key was refused. Enter this server's API key."
      : "This server needs an API key (DLSERVE_API_KEY) to show its docs.";
    form.hidden = false;
    document.getElementById("key").focus();
    return;
  }
  form.hidden = true;
  const ui = SwaggerUIBundle({
    spec: await response.json(),
    dom_id: "#swagger-ui",
    deepLinking: true,
    displayRequestDuration: true,
    validatorUrl: null, // the default sends the document to a validator on the internet
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
  const key = apiKey.get();
  if (key) {
    ui.authActions.authorize({ apiKey: {
      name: "apiKey", schema: { type: "http", scheme: "bearer" }, value: key } });
  }
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey.set(document.getElementById("key").value.trim());
  showDocs();
});
showDocs();
