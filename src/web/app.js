// Holdpoint inbox: live updates of the pending list, and a JSON check on the edit form
// before it is submitted. Everything here is optional: the forms work without it.
(function () {
  "use strict";

  var list = document.getElementById("pending");
  if (list && window.EventSource) {
    var refresh = function () {
      fetch("/inbox/list" + window.location.search, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (html === null) { return; }
          // The fragment is rendered by the server with every value escaped.
          list.innerHTML = html;
          list.setAttribute("data-updates", String(Number(list.getAttribute("data-updates") || 0) + 1));
        })
        .catch(function () {});
    };
    var source = new EventSource("/inbox/events");
    var first = true;
    source.addEventListener("pending", function () {
      if (first) { first = false; list.setAttribute("data-live", "1"); return; }
      refresh();
    });
  }

  var form = document.getElementById("edit-form");
  if (form) {
    var area = document.getElementById("edit-args");
    var error = document.getElementById("edit-error");
    var check = function () {
      try {
        JSON.parse(area.value);
        error.textContent = "";
        area.removeAttribute("aria-invalid");
        return true;
      } catch (e) {
        error.textContent = "Not valid JSON: " + e.message;
        area.setAttribute("aria-invalid", "true");
        return false;
      }
    };
    area.addEventListener("input", check);
    form.addEventListener("submit", function (ev) {
      if (!check()) { ev.preventDefault(); area.focus(); }
    });
  }
})();
