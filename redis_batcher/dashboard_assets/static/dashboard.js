// redis-batcher dashboard: refresh each page's live part without reloading the page, and ask
// before destructive actions. No build step, no dependencies.
(function () {
  "use strict";
  var every = parseInt(document.body.dataset.refreshMs || "5000", 10);

  function refresh(region) {
    if (document.hidden || region.contains(document.activeElement) && document.activeElement.tagName === "INPUT") {
      return;
    }
    fetch(region.dataset.live, { headers: { "X-Dashboard-Partial": "1" }, credentials: "same-origin" })
      .then(function (response) {
        if (response.redirected) { // the session ended: show the login form
          window.location.reload();
          return null;
        }
        return response.text();
      })
      .then(function (html) {
        if (html !== null) {
          region.innerHTML = html;
          region.classList.remove("stale");
        }
      })
      .catch(function () { region.classList.add("stale"); });
  }

  document.addEventListener("submit", function (event) {
    var question = event.target.dataset.confirm;
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  if (every > 0) {
    window.setInterval(function () {
      document.querySelectorAll("[data-live]").forEach(refresh);
    }, every);
  }
})();
